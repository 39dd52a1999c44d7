"""The pipeline: a recipe's schema and loading (`recipe`), the runner that executes its stages with
manifests, skip and resume (`runner`), the processes of a run (`processes`: multi-process launches
and clean children) and the run's HTML report (`report`). It sits above the stages; nothing below
imports it (docs/architecture.md)."""
