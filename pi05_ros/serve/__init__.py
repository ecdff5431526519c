"""Serving: openpi's websocket policy protocol over this engine, with dynamic batching (`pi05-serve`), a Ray Serve
deployment for many GPUs, and `RemotePolicy`, the client with `Policy.infer`'s interface. docs/serving.md."""
