"""The fused ops: the public functional API (functional), the torch custom-op registrations
(custom_ops), their eager references (reference), the dispatcher that picks Triton or eager
(dispatch), the derived-weight cache (derived) and the CPU's Winograd 3x3 convolution
(winograd). Imports vqfast.kernels, never the model."""
