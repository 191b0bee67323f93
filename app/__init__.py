"""saescope's web half: settings, database, loader (run folder into SQL), query layer, routes,
and the probe service. `app.main:create_app` builds the FastAPI application."""
