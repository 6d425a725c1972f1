"""Conversions: postbacks and the conversion pixel, from request to the stream."""
