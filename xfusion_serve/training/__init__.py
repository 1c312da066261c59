"""Training the vision tower (the paper's recipe) and the datasets it reads."""
