"""deltaserve's server: settings, HTTP API, engine, model, registry and jobs."""
