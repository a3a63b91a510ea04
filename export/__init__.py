"""Export formats for pruned models: hf, packed24 (sparse-24-bitmask), semi-structured (CUTLASS layout for
`SparseSemiStructuredTensor`), onnx and onnx-packed24, each verified, plus manifest.json.

Entry points: `export.api.export_all`, `export.api.prune_and_export`, `export.packed24.load_packed24`,
`export.semi_structured.load_sparse`; the CLI commands live in `export.cli`. See docs/export.md.
"""
