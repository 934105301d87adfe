// natgrad's C++ API for LibTorch users: every op as a plain C++ function (the same functions
// the dispatcher calls), the K-FAC rules both frontends share (kfac/kfac_rules.h), and the C++
// frontend built on them (csrc/frontend/: the capture layers natgrad::nn::Linear / Conv2d /
// Embedding, the optimizer natgrad::optim::KFAC and natgrad::EWC). Link against
// libnatgrad_frontend (CMake target natgrad::frontend, which links natgrad::natgrad, the ops).
#pragma once

#include "common/subnormal.h"
#include "empirical/empirical_fisher.h"
#include "empirical/layer_gram.h"
#include "ewc/ewc_penalty.h"
#include "factors/ekfac_diagonal.h"
#include "factors/kron_factors.h"
#include "frontend/ewc.h"
#include "frontend/kfac.h"
#include "frontend/layers.h"
#include "kfac/kfac_rules.h"
#include "linalg/ladder.h"
#include "linalg/psd_linalg.h"
#include "precondition/kfac_precondition.h"
#include "precondition/kfac_step.h"
