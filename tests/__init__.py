import pixart_cli  # noqa: F401  (its torchvision fix must run before tests import diffusers or transformers)
