"""Load: Hub ids, folders or objects -> float32 parents with their processors, checked against each other."""
