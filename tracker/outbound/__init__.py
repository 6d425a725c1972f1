"""Outbound postbacks: calling the traffic source's postback URL when a conversion changes."""
