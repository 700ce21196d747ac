"""Ray Serve deployments of AudioCLIP: a weight store, one deployment per tower, and an HTTP/handle router."""
