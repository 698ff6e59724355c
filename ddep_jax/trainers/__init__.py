"""The stages as data (`loop.Stage`) and the one loop that runs them (`loop.run`)."""
