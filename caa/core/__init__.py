"""What every stage runs on: hooks on decoder blocks (tensors only), prompts and their token
positions, memory budgets and batch sizes, work shared out over processes, option values."""
