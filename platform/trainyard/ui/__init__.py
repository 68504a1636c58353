"""What a person sees: the training view, the live trial table, and the HTML report."""
