"""virtio-snd: the VIRTIO sound device (device ID 25)."""
