"""Training objectives."""
from oncofusion.losses.multitask import MultitaskGradeSurvivalLoss as MultitaskGradeSurvivalLoss
