"""The VQModel: config, layers, blocks, quantizer, outputs, loading and saving, and patch (which
runs vqfast's ops on a live diffusers model). Imports vqfast.ops, never vqfast.cli."""
