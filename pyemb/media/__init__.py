"""virtio-media-py: V4L2 encapsulated in virtio (device 48)."""
