"""ZebraLogic logic-grid puzzles: generator, solvers, renderings and benchmark splits."""
