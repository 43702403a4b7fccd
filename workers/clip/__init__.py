"""gpu-clip: CLIP image-text similarity of every downloaded sample, and which ones are kept."""
