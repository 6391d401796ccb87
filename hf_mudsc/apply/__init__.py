"""Apply: matches -> merged parameters -> the merged model (classifier heads merged or concatenated)."""
