import csv
from pathlib import Path

import asyncpg
import pytest

from campaign.commands import importer
from tests.helpers.seed import create_campaign


async def _campaign(conn: asyncpg.Connection, status: str = "draft") -> int:
    return await create_campaign(conn, name="c", body="Hi $(name)", status=status)


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


async def test_import_loads_msisdn_and_variables(conn: asyncpg.Connection, tmp_path: Path) -> None:
    cid = await _campaign(conn)
    path = _write_csv(
        tmp_path / "r.csv",
        [
            ["name", "MSISDN", "city"],
            ["Ann, Jr.", " 919812345678 ", "Pune"],
            ['Bo "B"', "+447700900123", ""],
            ["Zoë 😀", "9812345679", "Köln"],
        ],
    )
    seen: list[int] = []
    result = await importer.import_csv(conn, cid, path, progress=seen.append)
    assert result.rows == 3
    assert seen[-1] == 3
    rows = await conn.fetch(
        "SELECT msisdn, variables, status FROM campaign.recipients WHERE campaign_id = $1 "
        "ORDER BY id",
        cid,
    )
    assert [r["msisdn"] for r in rows] == ["919812345678", "+447700900123", "9812345679"]
    assert rows[0]["variables"] == {"name": "Ann, Jr.", "city": "Pune"}
    assert rows[1]["variables"] == {"name": 'Bo "B"', "city": ""}
    assert rows[2]["variables"] == {"name": "Zoë 😀", "city": "Köln"}
    assert {r["status"] for r in rows} == {"pending"}


async def test_import_streams_many_chunks(conn: asyncpg.Connection, tmp_path: Path) -> None:
    cid = await _campaign(conn)
    n = importer.CHUNK_ROWS * 2 + 17
    rows = [["msisdn", "n"]] + [[f"9198{i:08d}", str(i)] for i in range(n)]
    path = _write_csv(tmp_path / "big.csv", rows)
    progress: list[int] = []
    result = await importer.import_csv(conn, cid, path, progress=progress.append)
    assert result.rows == n
    assert progress == [importer.CHUNK_ROWS, importer.CHUNK_ROWS * 2, n]
    count = await conn.fetchval(
        "SELECT count(DISTINCT variables->>'n') FROM campaign.recipients WHERE campaign_id = $1",
        cid,
    )
    assert count == n


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "the file is empty"),
        ([["phone", "name"], ["1", "a"]], "no 'msisdn' column"),
        ([["msisdn", "name", "Name"], ["1", "a", "b"]], "duplicate columns: name"),
        ([["msisdn", "name"], ["1", "a"], ["2"]], "line 3: 1 fields, the header has 2"),
    ],
)
async def test_bad_files_change_nothing(
    conn: asyncpg.Connection, tmp_path: Path, rows: list[list[str]], message: str
) -> None:
    cid = await _campaign(conn)
    path = _write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(importer.ImportFileError, match=message):
        await importer.import_csv(conn, cid, path)
    assert await conn.fetchval("SELECT count(*) FROM campaign.recipients") == 0


async def test_bad_row_after_a_full_chunk_rolls_back_everything(
    conn: asyncpg.Connection, tmp_path: Path
) -> None:
    cid = await _campaign(conn)
    rows = [["msisdn"]] + [[f"9198{i:08d}"] for i in range(importer.CHUNK_ROWS + 5)]
    rows.append(["1", "extra"])
    path = _write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(importer.ImportFileError, match="fields"):
        await importer.import_csv(conn, cid, path)
    assert await conn.fetchval("SELECT count(*) FROM campaign.recipients") == 0


async def test_unknown_or_finished_campaign_is_refused(
    conn: asyncpg.Connection, tmp_path: Path
) -> None:
    path = _write_csv(tmp_path / "r.csv", [["msisdn"], ["1"]])
    with pytest.raises(importer.ImportFileError, match="does not exist"):
        await importer.import_csv(conn, 424242, path)
    cid = await _campaign(conn)
    with pytest.raises(importer.ImportFileError, match="file not found"):
        await importer.import_csv(conn, cid, tmp_path / "absent.csv")
    cid = await _campaign(conn, status="cancelled")
    with pytest.raises(importer.ImportFileError, match="is cancelled"):
        await importer.import_csv(conn, cid, path)


async def test_non_utf8_file_is_a_clear_error(conn: asyncpg.Connection, tmp_path: Path) -> None:
    cid = await _campaign(conn)
    path = tmp_path / "latin1.csv"
    path.write_bytes("msisdn,name\n1,Jos\xe9\n".encode("latin-1"))
    with pytest.raises(importer.ImportFileError, match="not UTF-8"):
        await importer.import_csv(conn, cid, path)


async def test_the_copy_plans_its_foreign_key_checks_once(
    conn: asyncpg.Connection, tmp_path: Path
) -> None:
    # Our sessions plan every statement afresh (db.SERVER_SETTINGS); inside the COPY that
    # would plan each row's foreign key check again (twice as slow for a million rows).
    await conn.execute("SET plan_cache_mode = force_custom_plan")
    await conn.execute("CREATE TABLE public.copy_settings (mode text)")
    await conn.execute(
        """
        CREATE FUNCTION public.record_plan_mode() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO public.copy_settings VALUES (current_setting('plan_cache_mode'));
            RETURN NULL;
        END $$;
        CREATE TRIGGER record_plan_mode AFTER INSERT ON campaign.recipients
            FOR EACH STATEMENT EXECUTE FUNCTION public.record_plan_mode();
        """
    )
    try:
        cid = await _campaign(conn)
        path = _write_csv(tmp_path / "r.csv", [["msisdn"], ["+447700900123"]])
        assert (await importer.import_csv(conn, cid, path)).rows == 1
        assert await conn.fetchval("SELECT array_agg(mode) FROM public.copy_settings") == ["auto"]
        # Only for the COPY: the session keeps its own setting.
        assert await conn.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
    finally:
        await conn.execute(
            "DROP TRIGGER record_plan_mode ON campaign.recipients;"
            "DROP FUNCTION public.record_plan_mode(); DROP TABLE public.copy_settings"
        )
