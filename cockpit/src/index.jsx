import "@patternfly/react-core/dist/styles/base.css";
import "./app.css";
import { createRoot } from "react-dom/client";
import { App } from "./app.jsx";
import { createStore } from "./store.js";

const store = createStore();
window.cockpit.translate();
createRoot(document.getElementById("app")).render(<App store={store} />);
