"""Where work runs. Knows nothing of SSL: it runs a callable with resources and reports its state."""
