"""The frozen components around the transformer: the T5 text encoder (``text``, ``t5``) and the autoencoder
(``autoencoders``: a VAE or pixel space), located by ``resolve`` (local directory, ``builtin:NAME``, hub cache)."""
