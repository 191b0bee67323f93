"""saescope's tests, a package: helpers are imported as `tests.<module>` (`tests.tiny_model`,
`tests.app.webrun`) from the repository root, which pytest puts on sys.path (its rootdir)."""
