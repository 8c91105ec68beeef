"""The search: study files, the trial record, objective, coordinator, workers, storage, export."""
