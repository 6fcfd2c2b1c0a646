"""pyemb: QEMU virtio devices whose behaviour is written in Python."""
