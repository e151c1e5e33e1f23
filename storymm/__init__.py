"""storymm: multimodal story continuation (StoryReasoning) from a laptop to a cluster."""

__version__ = "0.1.0"
