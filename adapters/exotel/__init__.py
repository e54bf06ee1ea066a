"""Exotel phone calls (issue 14): the wire codec and request verification."""
