"""Training data: the ShapesWorld synthetic world (``shapes``) and its exact detector (``shapes_detect``)."""
