"""What runs on a model worker: model loading, the predict task, output guardrails."""
