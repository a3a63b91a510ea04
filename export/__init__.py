"""Export formats for pruned models: hf, packed24 (sparse-24-bitmask), semi-structured (CUTLASS layout for
`SparseSemiStructuredTensor`), onnx and onnx-packed24, each verified, plus manifest.json.

Entry points: `export.api.export_all`, `export.api.prune_and_export`; the format registry is `export.formats`, the
CLI commands live in `export.cli`. Loading the formats is the runtimes' job (`runtime.load_packed24`,
`runtime.load_packed24_cpu`, `runtime.load_sparse`). See docs/export.md.
"""
