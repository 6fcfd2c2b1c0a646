"""virtio-video: the ChromeOS/crosvm dialect (device IDs 30 and 31)."""
