"""Further merge methods (breadcrumbs, della, model_stock, TSV, Iso-C, ...): see issue 6."""
