"""Training: typed recipes (``recipe``), the dry-run plan (``plan``), the batches a recipe trains on
(``batches``), the model a stage starts from (``setup``), checkpoints and exact resume (``resume``), the EMA
(``ema``), the loop itself (``loop``) and its loss plot (``plot``); ``prepare`` builds the feature cache a recipe
trains on."""
