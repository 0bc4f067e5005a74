"""The fused ops: the public functional API (functional), the torch custom-op registrations
(custom_ops), their eager references (reference), the dispatcher that picks Triton or eager
(dispatch) and the derived-weight cache (derived). Imports vqfast.kernels, never the model."""
