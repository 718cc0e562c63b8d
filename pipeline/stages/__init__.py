"""The stages after storage, one module each (see `pipeline.run.stages`)."""
