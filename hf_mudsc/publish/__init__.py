"""Publish: the merged folder (model, processor, card, recipe, ownership marker), written atomically and pushed."""
