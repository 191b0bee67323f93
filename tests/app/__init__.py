"""The web app's tests and their helpers (tests.app.webrun, tests.app.databases, tests.app.servers, ...)."""
