"""Low-rank adapters (LoRA, DoRA) on a frozen PixArt, built with peft: training, the adapter directory, merging and
export to diffusers' PEFT layout."""
