"""Checkpoints: our self-describing safetensors directories (``format``), safe reading and conversion from/to
the official and diffusers layouts (``convert``), DiT → PixArt re-parameterisation (``init_from_dit``), and the
round-trip checks of `pixart selfcheck` (``selfcheck``)."""
