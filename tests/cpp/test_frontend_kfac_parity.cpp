// natgrad::optim::KFAC against natgrad.KFAC (Python, the reference): ten steps of every case of
// tests/fixtures/make_kfac_parity.py give the same parameters to 1e-10 (float64).
#include "test_frontend_kfac_models.h"
#include "test_helpers.h"

namespace {

using natgrad_test::Case;

class ApiKfacParity : public ::testing::TestWithParam<Case> {};

TEST_P(ApiKfacParity, TenStepsMatchPythonKfac) {
  const Case& c = GetParam();
  natgrad_test::Model m = natgrad_test::make_model(c.model);
  natgrad::optim::KFAC opt(m.module, c.options());
  natgrad_test::train(m, opt, c, 0, natgrad_test::kParitySteps);
  EXPECT_TRUE(opt.nonfinite_skips().empty());
  for (const auto& item : m.module->named_parameters()) {
    const torch::Tensor& expected = natgrad_test::fixture_tensor(c.name + "/final/" + item.key());
    const torch::Tensor& init = natgrad_test::fixture_tensor(c.model + "/init/" + item.key());
    EXPECT_FALSE(torch::equal(expected, init)) << item.key() << " never moved in Python";
    EXPECT_TRUE(natgrad_test::AllClose(item.value(), expected, natgrad_test::kTol64, 1e-12))
        << c.name << ": " << item.key();
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, ApiKfacParity, ::testing::ValuesIn(natgrad_test::parity_cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return info.param.name;
                         });

}  // namespace
