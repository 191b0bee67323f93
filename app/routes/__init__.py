"""One APIRouter per noun: saes (index and SAE pages), features, probe."""
