"""tokenloom pipeline shim: lets diffusers' generic loader find the class (needs tokenloom)."""
from tokenloom.pipelines.text_to_image import TextToImagePipeline  # noqa: F401
