"""The I/O drivers that run the adapters' sans-I/O protocol objects on a transport."""
