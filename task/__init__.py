"""The learning task shared by server and sites: data, models, training. No Flower here."""
