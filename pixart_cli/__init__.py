"""pixart: train, sample, convert and evaluate PixArt-α text-to-image diffusion transformers."""

try:  # installed: the start-up hook applies the torchvision fix when torchvision is first imported, by anyone
    import _pixart_torchvision_hook

    _pixart_torchvision_hook.install()
except ImportError:  # a source tree used without installing: apply the fix now (this imports torch)
    from pixart_cli import _torchvision_compat  # noqa: F401

__version__ = "0.1.0"
