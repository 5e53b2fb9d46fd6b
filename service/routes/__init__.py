"""Thin HTTP routers, one per surface: ops, the native v1 API, the Hugging Face Inference API shape."""
