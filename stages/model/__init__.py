"""Model code (single-device): the ViT family, position-embedding resampling, timm interop."""
