"""whetstone.losses"""

# Preference losses (one per module; see each class docstring). "X as X" marks re-exports.
from whetstone.losses.bradley_terry import BradleyTerryLoss as BradleyTerryLoss
from whetstone.losses.dpo import DPOLoss as DPOLoss
from whetstone.losses.npo import NPOLoss as NPOLoss
from whetstone.losses.ns_dpo import NSDPOLoss as NSDPOLoss
from whetstone.losses.orpo import ORPOLoss as ORPOLoss
from whetstone.losses.preference_base import PreferenceLossOutput as PreferenceLossOutput
from whetstone.losses.preference_base import time_discount_weights as time_discount_weights
from whetstone.losses.preference_base import time_weight_keep_mask as time_weight_keep_mask
from whetstone.losses.simpo import SimPOLoss as SimPOLoss
