// placeholder, filled in with amend
#include "img/tests/img_test_util.h"
