"""The report's confusion cells, on a model that confuses one way only: three tigger-coloured photos filed
under misty, all in the test split. So the cell (true misty, predicted tigger) counts them and its mirror
(true tigger, predicted misty) counts none; a cell that swapped its true and predicted filters would show
the wrong photos. Every cell of the served report opens exactly the photos it counts."""
import csv
import re

import pytest
import yaml
from _server import Server
from test_browser import browser, wait  # noqa: F401  (the module's Chromium)

from conftest import CLASS_COLOURS, cli, make_dataset, make_image

MISFILED = 3


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    project = tmp_path_factory.mktemp("cells")
    make_dataset(project / "photos", per_class=12)
    for i in range(MISFILED):
        make_image(project / "photos" / "misty" / f"misfiled_{i}.png", CLASS_COLOURS["tigger"], 77_000 + i)
    rows = []
    for i, path in enumerate(sorted((project / "photos").rglob("*.png"))):
        relative = path.relative_to(project / "photos").as_posix()
        split = "test" if "misfiled" in relative or i % 4 == 0 else "val" if i % 4 == 1 else "train"
        rows.append((relative, split))
    with open(project / "split.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "split"), *rows])
    (project / "params.yaml").write_text(yaml.safe_dump({
        "data": {"root": "photos", "split_csv": "split.csv"}, "features": {"backbone": "tiny", "batch_size": 8}}))
    assert cli(project, "all").returncode == 0
    server = Server(project)
    yield server
    server.stop()


def test_every_confusion_cell_opens_the_photos_it_counts(served):
    status, _, page = served.get("/report")
    assert status == 200
    cells = {(t, p): int(n) for t, p, n in re.findall(r"<td data-true='([^']+)' data-predicted='([^']+)'>(\d+)</td>",
                                                       page)}
    assert len(cells) == 9
    assert cells[("misty", "tigger")] >= MISFILED and cells[("tigger", "misty")] == 0  # the data is one-sided
    for (true, predicted), count in cells.items():
        status, _, photos = served.get(f"/photos?true={true}&predicted={predicted}")
        assert status == 200 and photos.count("<figure>") == count, (true, predicted)
    status, _, photos = served.get("/photos?true=misty&predicted=tigger")
    assert all(f"misfiled_{i}" in photos for i in range(MISFILED))


def test_in_the_browser_each_cell_links_to_its_own_photos(browser, served):  # noqa: F811
    """The report page's script makes each cell a link (in Chromium): following the one-sided cell and its
    mirror opens the photos that each counts."""
    from selenium.webdriver.common.by import By

    for (true, predicted), wanted in {("misty", "tigger"): MISFILED, ("tigger", "misty"): 0}.items():
        browser.get(served.url + "/report")
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "td[data-true] a"))
        cell = browser.find_element(By.CSS_SELECTOR, f"td[data-true='{true}'][data-predicted='{predicted}'] a")
        assert int(cell.text) >= wanted
        count = int(cell.text)
        cell.click()
        wait(browser, lambda d: "/photos" in d.current_url)
        figures = browser.find_elements(By.TAG_NAME, "figure")
        assert len(figures) == count, (true, predicted)
        if wanted:
            assert sum("misfiled_" in f.get_attribute("innerHTML") for f in figures) == MISFILED
