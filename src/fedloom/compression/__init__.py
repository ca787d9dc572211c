"""Compressed communication: update codecs that turn a flat float32 update into bytes and back."""
